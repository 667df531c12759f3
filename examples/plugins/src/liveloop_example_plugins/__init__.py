"""Example liveloop plugins, one per stage: hide_categories.py, loyalty_boost.py, amount_reward.py."""
