import pytest

from shardlog.wire.ctrargs import CtrArgsError, SyncMode, parse_ctr_string


def test_core_log_as_the_kernel_sends_it():
    config = parse_ctr_string("131072 core 1024")
    assert (config.target_sectors, config.log_type, config.region_size) == (131072, "core", 1024)
    assert config.device is None and not config.is_disk
    assert config.sync_mode is SyncMode.DEFAULT and not config.block_on_error
    assert config.region_count == 128


def test_disk_log_with_major_minor_and_every_flag():
    config = parse_ctr_string("2097152 clustered-disk 253:2 1024 nosync block_on_error")
    assert config.is_disk and config.device == "253:2"
    assert config.sync_mode is SyncMode.NOSYNC and config.block_on_error
    assert config.region_count == 2048
    assert config.table_args() == "clustered-disk 4 253:2 1024 nosync block_on_error "


def test_region_count_rounds_up_a_partial_last_region():
    assert parse_ctr_string("1025 core 1024").region_count == 2
    assert parse_ctr_string("1024 core 1024").region_count == 1


def test_table_args_follow_the_in_kernel_format():
    assert parse_ctr_string("8192 core 1024").table_args() == "core 1 1024 "
    assert parse_ctr_string("8192 core 1024 sync").table_args() == "core 2 1024 sync "
    assert parse_ctr_string("8192 disk /dev/x 1024").table_args() == "disk 2 /dev/x 1024 "


@pytest.mark.parametrize(
    ("ctr", "reason"),
    [
        ("131072 core 1000", "not a power of two"),
        ("131072 core 1", "not a power of two"),
        ("131072 core 0", "must not be 0"),
        ("512 core 1024", "larger than the target"),
        ("131072 core -1024", "not a decimal number"),
        ("131072 core 0x400", "not a decimal number"),
        ("0 core 1024", "must not be 0"),
        ("abc core 1024", "not a decimal number"),
        ("131072 mirror 1024", "unsupported log type"),
        ("131072 core", "needs"),
        ("131072 disk 7:2", "needs '<log device> <region_size>'"),
        ("131072 core 1024 sync nosync", "more than one of sync/nosync"),
        ("131072 core 1024 2", "unexpected argument '2'"),  # capture-badcount's wrong count
        ("131072 core 1024 integrated_flush", "unexpected argument"),
        ("131072 core 1024 block_on_error block_on_error", "unexpected argument"),
        (f"{1 << 40} core 2", "exceed shardlog's limit"),
        (f"{1 << 40} core {1 << 32}", "exceeds 2147483648 sectors"),
    ],
)
def test_unusable_constructors_are_refused_with_the_reason(ctr, reason):
    with pytest.raises(CtrArgsError, match=reason):
        parse_ctr_string(ctr)
