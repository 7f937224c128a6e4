"""Standalone training scripts for the ProstateSeg networks (imports segcore; segcore never imports this)."""
