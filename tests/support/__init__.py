"""Helpers the tests share (never tests themselves): the native step's old interface, fixtures' paths."""
