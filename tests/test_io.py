from freeshap_dq.io import available_memory


def test_available_memory_counts_the_reclaimable_page_cache(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(meminfo) == 20000000 * 1024  # not MemFree: a kernel folder just written is cache


def test_available_memory_falls_back_to_the_free_pages(tmp_path):
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(available_memory(tmp_path / "missing") - free) < 2**30
    assert available_memory() > 0
