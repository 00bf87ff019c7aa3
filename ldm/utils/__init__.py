"""ldm.utils"""
