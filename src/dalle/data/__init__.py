"""dalle.data"""
