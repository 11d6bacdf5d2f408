"""Test helper: a GGUF model rewritten with every tensor in F32: the weights transformers dequantizes when it
loads the GGUF, so llama.cpp and torch then compute with the same numbers. Parity checks use it
to tell the code's agreement from the quantization's (Q4_1 vs F32 block outputs differ by ~1%
on the default model; on the F32 copy, by float rounding). numpy + gguf only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caa_local.core.atomic import atomic_path


def dequantized_copy(source: Path, target: Path, force: bool = False) -> Path:
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(source))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    with atomic_path(target, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            for name, field in reader.fields.items():
                if name.startswith("GGUF.") or name == "general.architecture":
                    continue
                if name == "general.file_type":
                    writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
                    continue
                value_type = field.types[0]
                if value_type == gguf.GGUFValueType.ARRAY:
                    sub = field.types[-1]
                    if sub == gguf.GGUFValueType.STRING:
                        values = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
                    else:
                        values = [field.parts[i].tolist()[0] for i in field.data]
                    writer.add_array(name, values)
                elif value_type == gguf.GGUFValueType.STRING:
                    writer.add_string(name, str(bytes(field.parts[-1]), "utf-8"))
                else:
                    writer.add_key_value(name, field.parts[-1].tolist()[0], value_type)
            for tensor in reader.tensors:
                data = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
                shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists ne fastest first
                writer.add_tensor(tensor.name, np.ascontiguousarray(data.reshape(shape)))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return target
