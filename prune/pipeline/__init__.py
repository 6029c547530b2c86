"""The pipeline: choose units layer by layer (selection, observe), cut them (surgery), run the job."""
