"""Task datasets: readers for easy-VQA and the X-VLM JSON formats, tokenizers, prepare and batching."""
