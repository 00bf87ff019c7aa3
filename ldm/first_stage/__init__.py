"""ldm.first_stage"""
