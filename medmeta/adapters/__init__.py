"""medmeta.adapters"""
