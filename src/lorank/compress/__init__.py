"""lorank.compress"""
