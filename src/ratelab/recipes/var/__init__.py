"""Recipe ``var`` (VAR, Tian et al., NeurIPS 2024, and M-VAR, Ren et al., arXiv 2411.10433)."""
