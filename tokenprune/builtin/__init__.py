"""The built-in trained toy LLaVA (`builtin:toy-llava`) and its VQA task (`builtin:toy-vqa`)."""
