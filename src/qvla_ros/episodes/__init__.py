"""Episodes on disk: rosbag2 + MCAP recordings of the rig (simulated or real), their writer and reader. No ROS.

from qvla_ros.episodes import EpisodeWriter, read_episode, EpisodeError, load_topic_config
"""

from qvla_ros.episodes.reader import (
    Episode,
    EpisodeChecksumError,
    EpisodeError,
    Sample,
    build_samples,
    check_integrity,
    read_episode,
    read_streams,
)
from qvla_ros.episodes.topics import TopicConfig, TopicConfigError, load_topic_config
from qvla_ros.episodes.writer import SIM_EPOCH_NS, EpisodeWriter, sim_stamp_ns

__all__ = [
    "SIM_EPOCH_NS",
    "Episode",
    "EpisodeChecksumError",
    "EpisodeError",
    "EpisodeWriter",
    "Sample",
    "TopicConfig",
    "TopicConfigError",
    "build_samples",
    "check_integrity",
    "load_topic_config",
    "read_episode",
    "read_streams",
    "sim_stamp_ns",
]
