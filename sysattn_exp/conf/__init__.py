"""The Hydra config tree, shipped as package data (found as pkg://sysattn_exp.conf)."""
