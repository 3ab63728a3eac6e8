# One-node Slurm cluster for tests; the main Makefile includes this file.
# State lives in $(HPCDL_SLURM_DIR) if set, else .slurm/ at the repository root.
SLURM_LOCAL := $(dir $(lastword $(MAKEFILE_LIST)))

.PHONY: slurm-up slurm-down

slurm-up:  ## start munge, slurmctld and slurmd (installs slurm-wlm if missing)
	$(SLURM_LOCAL)up.sh

slurm-down:  ## stop what slurm-up started
	$(SLURM_LOCAL)down.sh
