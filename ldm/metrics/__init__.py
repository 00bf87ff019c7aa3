"""ldm.metrics"""
