"""transformers' greedy tokens and routed experts for benchmarks/routing_check.py's prompts (batch 32, 6 steps), on
a random checkpoint at qwen3-30b-a3b's shape cut to 4 layers, written by benchmarks/random_checkpoint.py into
/tmp/col/q4 (the qwen3-30b-a3b shape's config with num_hidden_layers = 4); then the comparison with moeserve's run
(routing_check.py run --engine moeserve --model /tmp/col/q4 --out /tmp/col/mo4.json --batch 32 --steps 6
--max-model-len 512 --engine-args '{"device": "cpu", "dtype": "float32", "kv_cache_memory_bytes": 8000000000}')."""
import sys, json, torch
sys.path.insert(0, '/work/main/benchmarks')
import routing_check as rk
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained('/tmp/col/q4', dtype=torch.float32).eval()
cfg = json.load(open('/tmp/col/q4/config.json'))
B, steps, k = 32, 6, cfg['num_experts_per_tok']
prompts = rk._prompts(B, cfg['vocab_size'])
ids = torch.tensor(prompts)
pkv = None; toks = [[] for _ in range(B)]; routes = [[] for _ in range(B)]
cur = ids
with torch.no_grad():
    for s in range(steps):
        out = m(input_ids=cur, past_key_values=pkv, use_cache=True, output_router_logits=True)
        pkv = out.past_key_values
        if s:
            for b in range(B):
                routes[b].append([lg.view(B, -1, lg.shape[-1])[b, -1].topk(k).indices.tolist() for lg in out.router_logits])
        nxt = out.logits[:, -1].argmax(-1)
        for b in range(B): toks[b].append(int(nxt[b]))
        cur = nxt[:, None]
res = {"engine": "transformers", "tokens": toks, "routes": routes, "batch": B, "steps": steps, "top_k": k, "num_experts": cfg["num_experts"]}
json.dump(res, open('/tmp/col/hf4.json', 'w'))
rk.main(['compare', '/tmp/col/mo4.json', '/tmp/col/hf4.json'])
