"""ldm.convert"""
