"""dalle.eval"""
