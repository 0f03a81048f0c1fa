"""medmeta.training"""
