"""lorank.nn"""
