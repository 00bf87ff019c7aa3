"""ldm.diffusion.samplers"""
