"""The DAgger replay buffer: webdataset shards of student inputs, their manifest, replay policies.

writer.py   atomic shard writing and manifest updates under a file lock (concurrent writers)
reader.py   shuffled streaming, split by node/worker, damaged shards skipped and counted
replay.py   FIFO bound and prioritised replay
manifest.py the manifest schema and the compatibility check for appends
sources.py  the data source: real data forward-diffused to student timesteps
"""

from ddil_cli.buffer.reader import BufferReader, BufferSample, mix_streams
from ddil_cli.buffer.replay import FIFOPolicy, PrioritizedPolicy
from ddil_cli.buffer.writer import BufferWriter, load_manifest

__all__ = ["BufferReader", "BufferSample", "BufferWriter", "FIFOPolicy", "PrioritizedPolicy",
           "load_manifest", "mix_streams"]
