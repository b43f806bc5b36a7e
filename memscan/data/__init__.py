"""Inputs: training sets and prompt lists."""
