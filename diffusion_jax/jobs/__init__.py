"""Jobs that compose the library (the floor above training and sampling).

`sweep`: a guidance-scale x steps grid for one model (`launch.sweep`); `fid_table`:
the paper's FID tables from configs (`launch.fid_table`). The quickstart
(`diffusion_jax.quickstart`) is on this floor too.
"""
