#pragma once
// shardopt: ZeRO-style sharded optimizers for C++ trainers. Include this, link shardopt::shardopt.
#include "shardopt/backend.hpp"
#include "shardopt/bootstrap.hpp"
#include "shardopt/checkpoint.hpp"
#include "shardopt/communicator.hpp"
#include "shardopt/cuda.hpp"
#include "shardopt/config.hpp"
#include "shardopt/dtype.hpp"
#include "shardopt/engine.hpp"
#include "shardopt/error.hpp"
#include "shardopt/estimate.hpp"
#include "shardopt/layout.hpp"
#include "shardopt/memory.hpp"
#include "shardopt/mpi.hpp"
#include "shardopt/rules.hpp"

#define SHARDOPT_VERSION_MAJOR 0
#define SHARDOPT_VERSION_MINOR 1
#define SHARDOPT_VERSION_PATCH 0
