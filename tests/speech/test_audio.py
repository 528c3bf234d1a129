"""prepare_audio / load_wav: dtype scaling, downmix, exact-ratio resampling, clear errors."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from sq_plugin.speech.audio import SAMPLE_RATE, load_wav, prepare_audio


def _tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_sample_rate_constant() -> None:
    assert SAMPLE_RATE == 16000


def test_float_16k_passthrough() -> None:
    x = _tone(16000)
    y = prepare_audio(x, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, x)


def test_int16_is_scaled() -> None:
    x = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    y = prepare_audio(x, 16000)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0.0, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-7)


@pytest.mark.parametrize(("rate", "expected_len"), [(22050, 16000), (44100, 16000), (8000, 16000)])
def test_resampling_length(rate: int, expected_len: int) -> None:
    y = prepare_audio(_tone(rate), rate)
    assert len(y) == expected_len
    assert y.dtype == np.float32


def test_resampling_odd_length_and_frequency_preserved() -> None:
    # 22050 -> 16000 is up 320 / down 441: length is ceil(n * 320 / 441).
    n = 12345
    y = prepare_audio(_tone(22050, seconds=n / 22050), 22050)
    assert len(y) == -(-n * 320 // 441)
    # a 440 Hz tone must still peak at 440 Hz after resampling
    y = prepare_audio(_tone(22050, 2.0), 22050)
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(y)
    assert abs(peak_hz - 440.0) < 1.0
    assert 0.45 < np.max(np.abs(y[1000:-1000])) < 0.55


def test_stereo_downmix_both_layouts() -> None:
    left = np.full(100, 0.5, dtype=np.float32)
    right = np.full(100, -0.1, dtype=np.float32)
    channels_first = np.stack([left, right])  # (2, 100)
    channels_last = channels_first.T  # (100, 2)
    for x in (channels_first, channels_last):
        y = prepare_audio(x, 16000)
        assert y.shape == (100,)
        np.testing.assert_allclose(y, 0.2, atol=1e-7)
    mono_2d = left[None, :]
    assert prepare_audio(mono_2d, 16000).shape == (100,)


def test_output_clipped_to_unit_range() -> None:
    y = prepare_audio(np.array([2.0, -3.0, 0.25]), 16000)
    np.testing.assert_array_equal(y, np.array([1.0, -1.0, 0.25], dtype=np.float32))


def test_empty_audio_error_names_input() -> None:
    with pytest.raises(ValueError, match=r"my_clip: audio is empty.*pass at least one sample"):
        prepare_audio(np.zeros(0, dtype=np.float32), 16000, name="my_clip")


def test_nan_inf_error() -> None:
    x = np.array([0.0, np.nan, np.inf, 0.1])
    with pytest.raises(ValueError, match=r"clip7: audio contains 2 NaN/Inf values.*nan_to_num"):
        prepare_audio(x, 16000, name="clip7")


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, None])
def test_bad_sample_rate_error(rate: object) -> None:
    with pytest.raises(ValueError, match=r"utt: sample rate must be a positive integer.*got .*pass the rate"):
        prepare_audio(np.zeros(10), rate, name="utt")  # type: ignore[arg-type]


def test_too_many_channels_error() -> None:
    with pytest.raises(ValueError, match=r"a: audio has 3 channels.*downmix or select channels"):
        prepare_audio(np.zeros((3, 100)), 16000, name="a")
    with pytest.raises(ValueError, match=r"a: audio has 3 dimensions"):
        prepare_audio(np.zeros((2, 2, 100)), 16000, name="a")


def test_load_wav_roundtrip(tmp_path) -> None:
    path = tmp_path / "stereo.wav"
    data = (np.arange(2 * 441, dtype=np.int16).reshape(441, 2) * 7) % 3000
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(44100)
        f.writeframes(data.astype("<i2").tobytes())
    samples, rate = load_wav(path)
    assert rate == 44100
    assert samples.dtype == np.int16 and samples.shape == (441, 2)
    np.testing.assert_array_equal(samples, data)
    y = prepare_audio(samples, rate)
    assert y.shape == (160,) and y.dtype == np.float32
