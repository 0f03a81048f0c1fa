"""medmeta.evaluation"""
