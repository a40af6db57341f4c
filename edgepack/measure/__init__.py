"""Measurements. Each returns plain dicts that say what, where, how and on what data."""
