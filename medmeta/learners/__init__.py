"""medmeta.learners"""
