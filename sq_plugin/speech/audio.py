"""Audio normalisation: every model in this package takes float32 mono 16 kHz samples in [-1, 1]."""

from __future__ import annotations

import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000


def prepare_audio(audio: np.ndarray, sample_rate: int, *, name: str = "audio") -> np.ndarray:
    """Return `audio` as float32 mono 16 kHz samples in [-1, 1].

    - dtype: int16 is scaled by 1/32768; int32 by 1/2**31; uint8 (8-bit WAV) is centred and scaled;
      float input is taken as already in [-1, 1] and clipped to it.
    - channels: 1-D input is mono. 2-D input with 1 or 2 channels, either (channels, samples) or
      (samples, channels) (the shorter axis is the channel axis), is downmixed by averaging the
      channels. More than 2 channels is an error (no standard downmix is assumed).
    - sample rate: any other rate is resampled to 16 kHz with `scipy.signal.resample_poly` using the
      exact rational ratio 16000/sample_rate reduced by their gcd (e.g. 22050 Hz -> up 320, down 441),
      which applies an anti-aliasing FIR filter. The output has ceil(n * 16000 / sample_rate) samples.

    Raises ValueError (the message names `name`, the problem and the fix) for empty audio, NaN/Inf
    values, more than 2 channels, more than 2 dimensions or a non-positive / non-integer sample rate.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise ValueError(
            f"{name}: sample rate must be a positive integer in Hz, got {sample_rate!r}; "
            f"pass the rate the audio was recorded at (e.g. 16000, 22050, 44100)"
        )
    x = np.asarray(audio)
    if x.size == 0:
        raise ValueError(f"{name}: audio is empty (shape {x.shape}); pass at least one sample")
    if x.ndim > 2:
        raise ValueError(
            f"{name}: audio has {x.ndim} dimensions (shape {x.shape}); pass 1-D mono samples or a 2-D "
            "(channels, samples) / (samples, channels) array"
        )

    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif x.dtype == np.int32:
        x = (x.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ValueError(
                f"{name}: audio contains {bad} NaN/Inf values; clean the signal first "
                "(e.g. np.nan_to_num) or check the decoder that produced it"
            )
    else:
        raise ValueError(
            f"{name}: unsupported audio dtype {x.dtype}; pass float32/float64 in [-1, 1] or int16 PCM"
        )

    if x.ndim == 2:
        channel_axis = 0 if x.shape[0] <= x.shape[1] else 1
        channels = x.shape[channel_axis]
        if channels > 2:
            raise ValueError(
                f"{name}: audio has {channels} channels (shape {x.shape}); only mono or stereo is "
                "supported; downmix or select channels yourself before calling prepare_audio"
            )
        # Average the channels: the usual stereo -> mono downmix (keeps the level of a centred source).
        x = x.mean(axis=channel_axis, dtype=np.float32)

    if sample_rate != SAMPLE_RATE:
        g = gcd(int(sample_rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)

    # Resampling can overshoot slightly past full scale; the contract is [-1, 1].
    return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)


def load_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file with the stdlib `wave` module: (samples, sample_rate).

    Samples keep the file's integer dtype (uint8, int16 or int32) and are shaped (samples,) for mono
    or (samples, channels) otherwise, ready for `prepare_audio`.
    """
    with wave.open(str(path), "rb") as f:
        channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(frames)
    dtypes = {1: np.dtype("u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
    if width not in dtypes:
        raise ValueError(
            f"{path}: {8 * width}-bit WAV is not supported; convert it to 16-bit PCM "
            "(e.g. sox in.wav -b 16 out.wav)"
        )
    data = np.frombuffer(raw, dtype=dtypes[width]).astype(dtypes[width].newbyteorder("="), copy=True)
    if channels > 1:
        data = data.reshape(-1, channels)
    return data, rate
