# An N-node Slurm cluster in network namespaces on this machine; the main Makefile includes this file.
# State lives in $(HPCDL_CLUSTER_DIR) if set, else .cluster/ at the repository root.
#   make cluster-up NODES=2 LINK=1gbit    (LINK= empty: unthrottled)     make cluster-down
CLUSTER_DIR := $(dir $(lastword $(MAKEFILE_LIST)))
NODES ?= 2
LINK ?=

.PHONY: cluster-up cluster-down scale-cluster strategies-cluster

cluster-up:  ## start the nodes, slurmctld and a slurmd per node (installs what is missing)
	NODES=$(NODES) LINK=$(LINK) $(CLUSTER_DIR)up.sh

cluster-down:  ## stop every process the cluster started and remove its namespaces and links
	$(CLUSTER_DIR)down.sh

# The README's cross-node study: at each link speed, bench comm between the nodes, then 1 and 2 nodes
# (one rank each) of the same training; the report and a projection calibrated on that link's bench.
SCALE_LINKS ?= 1gbit 100mbit
CLUSTER_RUN = SLURM_CONF=$(abspath $(or $(HPCDL_CLUSTER_DIR),.cluster))/slurm.conf PATH=$(CURDIR)/$(BIN):$$PATH salloc -Q -N2
scale-cluster: $(STAMP)
	$(PY) -m hpcdl data make synthetic --n 20000 --no-progress --overwrite --out datasets/scale-synthetic.h5
	mkdir -p docs/scaling/cluster
	for link in $(SCALE_LINKS); do \
	  NODES=2 LINK=$$link $(CLUSTER_DIR)up.sh && rm -rf runs/scale-cluster-$$link && \
	  $(CLUSTER_RUN) $(PY) -m hpcdl bench comm --launcher srun --per-node 1 --max-bytes 4194304 --max-calls 200 \
	    --json docs/scaling/cluster/comm-$$link.json --overwrite && \
	  $(CLUSTER_RUN) $(PY) -m hpcdl scale run --config synthetic-mlp --label "2 nodes, $$link" \
	    --set data.path=datasets/scale-synthetic.h5 --set 'model.hidden=[256,256]' --set parallel.overlap=false \
	    --launcher srun --per-node 1 --ranks 1,2 --repeats 5 --steps 30 --warmup 5 --no-report \
	    --out runs/scale-cluster-$$link && \
	  $(PY) -m hpcdl scale project --study runs/scale-cluster-$$link --comm docs/scaling/cluster/comm-$$link.json \
	    --max-nodes 64 --out docs/scaling/cluster/projection-$$link || exit 1; \
	done
	NODES=2 LINK= $(CLUSTER_DIR)up.sh
	$(PY) -m hpcdl scale report $(foreach link,$(SCALE_LINKS),runs/scale-cluster-$(link)) --out docs/scaling/cluster

# The README's regimes of the synchronisation strategies: at each link speed, `hpcdl bench strategies` with one
# rank per node (parameter servers: node1 serves, node2 works), the projection calibrated on that link's bench.
strategies-cluster: $(STAMP)
	mkdir -p docs/strategies
	for link in $(SCALE_LINKS); do \
	  NODES=2 LINK=$$link $(CLUSTER_DIR)up.sh && \
	  $(CLUSTER_RUN) $(PY) -m hpcdl bench strategies --launcher mpiexec --per-node 1 --ranks 2 --batch 96 \
	    --set 'model.hidden=[256,256]' --epochs 8 --repeats 3 --target 0.95 \
	    --comm docs/scaling/cluster/comm-$$link.json --json docs/strategies/cluster-$$link.json --overwrite || exit 1; \
	done
	NODES=2 LINK= $(CLUSTER_DIR)up.sh
