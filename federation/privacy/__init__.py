"""Client-side privacy mechanisms: DP-SGD through Opacus (fixed, adaptive and the non-private
median clip rule), the LCD-VAE Lipschitz penalty and spectral-normalized decoders, and the
privacy ledger every DP step is recorded in."""
