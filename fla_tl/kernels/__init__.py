"""TileLang kernels, one folder per variant; shared stages live in `common`."""
