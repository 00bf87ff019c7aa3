"""ldm.nets"""
