"""Kernels: the valuation problem (train/test kernel blocks and labels), landmark kernels, kernel folders on
disk and the one home of the Nystrom set-up."""
