"""Minimal ctypes wrapper around the eSpeak NG library shipped by the `espeakng-loader` wheel.

Why not a system espeak: the wheel bundles `libespeak-ng.so` and `espeak-ng-data`, so synthesis works
from a plain `pip install` with no apt package. The library holds global state (current voice,
parameters, one synth callback), so every call goes through one lock.

Determinism: eSpeak NG keeps static state between utterances (glottal phase, pitch-flutter counter,
echo buffer) and seeds its noise generator from the clock, so the same text spoken twice in one process
gives different samples. Measured: the output depends on everything synthesized before it. To make a
corpus reproducible regardless of order, `limit` or cache state, every `synthesize` call unloads the
library (dlclose), reloads it (fresh static data), re-initialises it and seeds its noise generator
with `seed`. This costs ~4 ms per call (~8 ms total per utterance instead of ~4 ms).
"""

from __future__ import annotations

import _ctypes
import ctypes
import os
import threading
import warnings
from pathlib import Path

import numpy as np

ESPEAK_SAMPLE_RATE = 22050

# espeak_AUDIO_OUTPUT: synchronous mode delivers the audio to our callback before espeak_Synth returns.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_PARAMETER values (speak_lib.h).
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 0 continues synthesis.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_callback_ref: object | None = None  # keeps the ctypes callback alive (a GC'd callback would crash)
_chunks: list[np.ndarray] = []
_warned_still_loaded = False


def _unload() -> None:
    """Terminate and dlclose the library so the next `_load` starts from pristine static data."""
    global _lib
    if _lib is None:
        return
    _lib.espeak_Terminate()
    _ctypes.dlclose(_lib._handle)
    _lib = None
    _warn_if_still_loaded()


def _warn_if_still_loaded() -> None:
    """dlclose only unloads when nobody else holds the library (e.g. another package that dlopened
    the same file); then static state survives and synthesis is no longer reproducible."""
    global _warned_still_loaded
    if _warned_still_loaded:
        return
    import espeakng_loader

    try:
        probe = ctypes.CDLL(espeakng_loader.get_library_path(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return  # not loaded any more: the next load starts fresh, as intended
    _ctypes.dlclose(probe._handle)
    _warned_still_loaded = True
    warnings.warn(
        "libespeak-ng is also loaded by another component of this process, so sq_plugin cannot reset "
        "its state between utterances: synthesized audio may not be bit-reproducible",
        RuntimeWarning,
        stacklevel=3,
    )


def _load() -> ctypes.CDLL:
    """Load and initialise the library (caller holds the lock); no-op when already loaded."""
    global _lib, _callback_ref
    if _lib is not None:
        return _lib
    try:
        import espeakng_loader
    except ImportError as exc:
        raise RuntimeError(
            "eSpeak NG is not available: the Python package 'espeakng-loader' is not installed. "
            "Fix: pip install espeakng-loader"
        ) from exc
    lib_path = espeakng_loader.get_library_path()
    try:
        lib = ctypes.CDLL(lib_path)
        data_path = espeakng_loader.get_data_path()
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(
            f"could not load eSpeak NG from {lib_path!r} ({exc}). "
            "Fix: reinstall the package: pip install --force-reinstall espeakng-loader"
        ) from exc

    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None

    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    if rate != ESPEAK_SAMPLE_RATE:
        raise RuntimeError(f"espeak_Initialize returned {rate}, expected sample rate {ESPEAK_SAMPLE_RATE}")

    def _on_audio(wav: ctypes.POINTER(ctypes.c_short), numsamples: int, events: int) -> int:
        if numsamples > 0 and wav:
            _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    _callback_ref = _SYNTH_CALLBACK(_on_audio)
    lib.espeak_SetSynthCallback(_callback_ref)
    _lib = lib
    return lib


def _variant_exists(variant: str) -> bool:
    import espeakng_loader

    return (Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant).is_file()


def synthesize(
    text: str,
    voice: str = "en-us",
    rate: int = 175,
    pitch: int = 50,
    variant: str | None = None,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Speak `text` and return (int16 mono samples, 22050).

    voice: an eSpeak voice name such as "en-us", "en-gb-x-rp"; variant: a voice variant such as "f2"
    or "m3" (joined as "en-us+f2"). rate: words per minute (80..450); pitch: 0..99.
    seed: seeds eSpeak's noise generator (breathy variants use it). The result is a pure function of
    (text, voice, rate, pitch, variant, seed): the library is reloaded before every call.
    """
    if not text.strip():
        raise ValueError("synthesize(text=...): text is empty; pass at least one word")
    name = f"{voice}+{variant}" if variant else voice
    with _lock:
        _unload()
        lib = _load()
        if variant and not _variant_exists(variant):
            # eSpeak silently ignores an unknown variant; a typo would give the wrong speaker unnoticed.
            raise ValueError(
                f"synthesize(variant={variant!r}): eSpeak has no voice variant {variant!r}; use a file "
                "name from espeak-ng-data/voices/!v such as 'f2' or 'm3'"
            )
        lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        if lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
            raise ValueError(
                f"synthesize(voice={voice!r}, variant={variant!r}): eSpeak has no voice {name!r}; "
                "use a name from espeak-ng-data/voices (e.g. 'en-us', 'en-gb-x-rp') and variants like 'f2'"
            )
        # Set after the voice: selecting a voice resets rate/pitch to the voice's defaults.
        lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        _chunks.clear()
        data = text.encode("utf-8") + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err} for text {text!r}")
        audio = np.concatenate(_chunks) if _chunks else np.zeros(0, dtype=np.int16)
        _chunks.clear()
    return audio.astype(np.int16, copy=False), ESPEAK_SAMPLE_RATE
