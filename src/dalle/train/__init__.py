"""dalle.train"""
