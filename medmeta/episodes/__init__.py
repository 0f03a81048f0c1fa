"""medmeta.episodes"""
