"""ldm.callbacks"""
