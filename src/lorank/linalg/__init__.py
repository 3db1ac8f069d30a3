"""lorank.linalg"""
