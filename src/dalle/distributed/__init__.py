"""dalle.distributed"""
