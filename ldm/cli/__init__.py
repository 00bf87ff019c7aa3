"""ldm.cli"""
