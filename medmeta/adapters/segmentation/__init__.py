"""medmeta.adapters.segmentation"""
