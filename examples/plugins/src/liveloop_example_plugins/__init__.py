"""Example liveloop plugins, one per stage: see hide_categories.py and loyalty_boost.py."""
