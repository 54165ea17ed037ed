"""The test services' ports stay clear of the ones Ray and the kernel hand out themselves."""

from .ports import RAY_PORTS, _ephemeral_range, free_port


def test_free_ports_are_distinct_and_never_ephemeral_or_rays():
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high or p in RAY_PORTS or p < 20000]
