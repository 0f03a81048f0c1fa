"""medmeta.data"""
