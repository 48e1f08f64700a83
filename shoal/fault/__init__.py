"""fault"""
