"""lorank.train"""
