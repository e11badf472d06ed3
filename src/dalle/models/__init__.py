"""dalle.models"""
