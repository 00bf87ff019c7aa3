"""ldm.evaluation: the evaluation protocol shared by the training callback and evaluate.py
(sampling under real conditions, feeding the metrics) and evaluate.py's resumable, multi-rank
output folder. Sits between callbacks / cli and modules: it samples from a model, and the metrics
it feeds only score tensors."""
