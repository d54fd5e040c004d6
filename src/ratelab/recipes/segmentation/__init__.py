"""Recipe ``segmentation`` (emergence of segmentation in white-box transformers, Yu, Chu et al., CPAL 2024)."""
