"""medmeta.adapters.slides"""
